"""``python -m clipforge.bench``: clipforge against open_clip and Hugging Face, side by side.

One process measures every implementation on the same inputs (the same Flickr8k images and
captions, the same weights), interleaving them repetition by repetition so that load from other
processes hits all of them alike. Each figure is the median of ``--reps`` timed repetitions after
``--warmup`` untimed ones. See docs/benchmarks.md for the latest table and what it means.
"""
