"""longside.kernels"""
