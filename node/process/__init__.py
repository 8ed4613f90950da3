"""One image from pixels to its SR and summary image: analysis composed with the SR
(pipeline, summarize), and the per-image JSON results record (results).
"""
