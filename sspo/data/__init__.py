"""Training data: preference pairs or captioned images (or clips) as tensors in [-1, 1] with their prompt.

:mod:`~sspo.data.config` declares the ``data:`` section; :mod:`~sspo.data.sources` opens each file
format as rows; :mod:`~sspo.data.images` decodes, resizes, crops and flips an image or clip;
:mod:`~sspo.data.dataset` turns a row into an item (the winner, the loser, the prompt);
:mod:`~sspo.data.loader` reads micro-batches ahead in DataLoader workers.
"""
