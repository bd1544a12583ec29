"""Feature extraction: decode videos (video), run a frozen backbone (base: what every extractor
shares; backbones: build one by name; i3d, clip), store features in Parquet shards (shards), fan
out over Ray (run). config: the extractor settings; device: the device resolver; files: atomic
writes and file digests."""
