"""One image from pixels to its SR and summary image: analysis composed with the SR
(pipeline, summarize), one batch completed while the model runs on the next (overlap), and
the per-image JSON results record (results).
"""
