"""Where an image waits: the spool (its files, fsynced before the 0x0000 answer) and the
job table.
"""
