"""Offline input: push files, folders and zips to a PACS (push, archive, precheck);
classify an archive without a PACS (classify).
"""
