"""Where a result becomes DICOM: the SR (report; srtemplate, its fast encoder; codes),
the summary image (summary: pixels; summarysc: the Secondary Capture) and the
not-analysed notice.
"""
