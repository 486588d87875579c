"""longside.memory_bank"""
