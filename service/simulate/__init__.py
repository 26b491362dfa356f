"""``prelabel simulate``: an annotator played over HTTP on a labeled dataset, to measure what
pre-labeling saves (labels until suggestions, acceptance, accuracy per label budget)."""
