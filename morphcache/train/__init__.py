"""morphcache.train"""
