"""The miniature world: a procedural captioned domain with a trained CLIP, SD pipeline and judge, bundled as the
embedded default model ``miniworld``."""
