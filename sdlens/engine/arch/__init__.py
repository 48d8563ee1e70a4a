"""engine/arch"""
