"""genframe's own data modules, registered through the same hook plugins use."""

from genframe.hookspecs import hookimpl


@hookimpl
def genframe_register_data(register):
    register("digits", "genframe.data.digits:DigitsDataModule",
             description="scikit-learn's 1,797 handwritten 8x8 digits with labels (offline)")
    register("image_folder", "genframe.data.image_folder:ImageFolderDataModule",
             description="your images from a folder tree (sub-folders become labels)")
    register("captioned_folder", "genframe.data.captioned_folder:CaptionedFolderDataModule",
             description="your image + caption pairs: captions.jsonl or a .txt per image")
    register("text", "genframe.data.text:TextDataModule",
             description="text for language models: pydoc prose (offline), files or JSONL")
    register("shapes", "genframe.data.shapes:ShapesDataModule",
             description="captioned shapes genframe draws (offline); test = held-out pairs")
    register("chat", "genframe.data.chat:ChatDataModule",
             description="chat conversations from JSONL; the loss covers the assistant's turns")
    register("preference", "genframe.data.preference:PreferenceDataModule",
             description="prompt + chosen/rejected completions from JSONL, for DPO fine-tuning")
    register("image_shards", "genframe.data.shards:ImageShardsDataModule",
             description="images streamed from WebDataset shards (genframe shards); a part per rank")
    register("text_shards", "genframe.data.shards:TextShardsDataModule",
             description="token windows streamed from WebDataset shards (genframe shards)")
    register("subject", "genframe.data.subject:SubjectDataModule",
             description="a few images of one subject for finetune=subject (DreamBooth)")
