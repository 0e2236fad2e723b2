"""Base models of the world, built not downloaded: a tiny CLIP and a tiny LLaVA on its vision tower."""
