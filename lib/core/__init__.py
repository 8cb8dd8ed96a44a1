"""What every stage uses: the data error type, the CPUs this process may use, device settings (GPU, precision,
workers), and the notebooks' start (work from the repository root)."""
