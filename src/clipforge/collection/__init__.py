"""Use CLIP on a collection: embed images and texts (clip-retrieval's layout), index them, search them, serve a page.

This is the use path: it sits above models, checkpoints and transforms and never imports training.
"""
