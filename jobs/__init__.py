"""One Spark job per stage: pure DataFrame steps on top, ``run`` and ``main`` at the bottom."""
