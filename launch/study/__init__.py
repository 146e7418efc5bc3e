"""eossl.launch.study: scaling studies (a grid of pre-training runs, each evaluated).

``config`` reads a study file, ``run`` runs or emits its cells, ``report`` turns the cells' MLflow runs into
a table and plots, ``cli`` holds ``eossl study`` and ``eossl study report``. Kept empty so that building the
command line imports nothing heavy.
"""
