"""Label Studio ML backend: the protocol of DESIGN section 3.1 on top of prelabel projects."""
