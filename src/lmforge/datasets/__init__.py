"""Training-time feeding: packed LM blocks, SFT/classification records, MLM masking, batch sources."""
