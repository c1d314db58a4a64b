//! Partition tables: MBR (primaries, then logical partitions in the extended chain), GPT.
