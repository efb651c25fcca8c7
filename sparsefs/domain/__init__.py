"""libvirt domains: the typed binding, domain XML, run records, repair after a kill."""
