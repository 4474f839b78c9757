"""Entry points: ``torchrun -m launch.train``, ``launch/multinode.sh``, ``launch/slurm.sbatch``."""
