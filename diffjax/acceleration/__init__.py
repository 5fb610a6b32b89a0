"""Faster inference with the same parameters: spatially sparse incremental execution (:mod:`.sparse`)."""
