"""longside.eval"""
