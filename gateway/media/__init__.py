"""Media handling for bridge mode: carrier audio codecs and streaming resampling."""
