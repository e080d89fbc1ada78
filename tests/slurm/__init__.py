"""The Slurm test cluster: start.sh, stop.sh and their Python side (cluster.py)."""
