# examples/images.py
from redpool import current_job, on_child_start, task


@on_child_start
def connect():
    pass  # runs once in each pool process: open database connections here


@task                          # registered as "examples.images.resize"
def resize(path, width):
    return {"path": path, "width": width, "job": current_job().id}


@task(name="images.thumb")     # or under a name of your choosing
def thumb(path):
    return {"thumbnail": path.replace(".png", "-thumb.png")}
