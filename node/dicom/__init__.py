"""Encoded DICOM objects, below both the network and the SR: File Meta bytes and header
UIDs (wire), reading files (dicomio), UIDs (uids), association failures in words.
"""
