"""Video from still images: Stable Video Diffusion clips, MP4 and animated previews."""
