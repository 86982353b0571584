"""Helpers shared by the experiment scripts: model loading (``models``), cached assets (``assets``), result
tables and bootstrap intervals (``reporting``), metrics logging (``tracking``) and the command-line plumbing
(``cli``)."""
