"""Whole-system simulations: a virtual clock and a simulated network with RFC 4787 NATs."""
