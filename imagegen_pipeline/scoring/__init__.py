"""Image and clip quality: open_clip scores and pixel statistics."""
