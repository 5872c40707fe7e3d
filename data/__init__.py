"""Dataset preparation: from a folder of videos and a caption file to the latent shards `osp-train` reads.

`osp-data build` cuts bucketed clips, `encode` turns them into latents and text states, `inspect` and `bench` check.
"""
