"""Image formats: each module probes (is it this format?) and, where supported, decodes."""
