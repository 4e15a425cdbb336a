"""langneurons: find, classify and test the language neurons of Hugging Face causal LMs.

The pipeline is record -> identify -> anatomy -> intervene/evaluate -> compare -> report;
each stage is a module of the same name and writes its artifacts into one run directory.
"""

__version__ = "0.1.0"
