"""Lynx's parts, one file each: vision encoder, resampler, adapters, the composed model, checkpoint loading."""
