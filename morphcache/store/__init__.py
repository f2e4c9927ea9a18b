"""morphcache.store"""
