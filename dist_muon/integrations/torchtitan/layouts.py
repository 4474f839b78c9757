"""(in progress)"""
def check_parameter_layouts(part):
    return None
