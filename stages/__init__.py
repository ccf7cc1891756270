"""What a stage computes: blocks, local losses, models and partitioning."""
