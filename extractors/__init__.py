"""Feature extraction: decode videos (video), run a frozen backbone (backbones, i3d, clip),
store features in Parquet shards (shards), fan out over Ray (run)."""
