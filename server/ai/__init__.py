"""The AI loop: segmentation network, analysis of its output and the job machinery."""
