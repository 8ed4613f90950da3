"""The DICOM network layer. Images enter through the SCP (scp; gate: which connections
get a thread; intake: whether C-STOREs are still taken); SRs and pushed files leave
through the SCU (scu). The pynetdicom workarounds are in :mod:`node.net.fast`.
"""
