"""Evaluation: the official metrics (:mod:`.metrics`, with their loop twins; MATLAB's
``imresize``: :mod:`.imresize`), the baselines (:mod:`.baselines`), files for the authors' MATLAB
loops (:mod:`.matlab_export`)."""
