"""morphcache.extract"""
