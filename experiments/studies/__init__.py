"""Studies: measurements about the method itself, one command each.

    python -m experiments.studies.fitness_correlation   # stats fitness vs task score: Spearman over policies
"""
