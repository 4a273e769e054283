## The npcforge editor plugin: Godot needs one for the addon to be enabled. The NpcForgeClient
## node itself is registered by its class_name: enabling the plugin adds no autoloads.
@tool
extends EditorPlugin
