"""morphcache.evaluate"""
