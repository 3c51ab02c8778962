"""OVA/OVF packages and UEC tarballs."""
