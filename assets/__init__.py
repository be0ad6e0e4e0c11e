"""vltok.assets: small trained weights shipped with the package (the reference VLM delta)."""
