"""The APT method in pure torch: block map, adapters, salience, schedule, search, masks, slicing.

Nothing here imports DeepSpeed, so every piece is testable in one CPU process.
"""
