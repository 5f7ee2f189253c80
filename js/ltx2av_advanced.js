// Folds the advanced inputs of this pack's nodes on the classic canvas.
//
// The nodes declare their rarely changed inputs with ComfyUI's `advanced=True`. The Nodes 2.0 renderer and the
// properties panel fold those; the classic canvas has the machinery too (a widget with `advanced` set is hidden
// until the node's "Show Advanced" menu entry, LGraphNode.toggleAdvanced, shows it), but this frontend copies the
// flag only into `widget.options`. This sets it on the widget itself, for this pack's nodes only, and sizes a new
// node to what it shows. ComfyUI's "Always show advanced widgets" setting still shows everything.
import { app } from "../../scripts/app.js";

const PACK_PREFIX = "LTX2AV_";
const ALWAYS_SHOW = "Comfy.Node.AlwaysShowAdvancedWidgets";

function alwaysShowAdvanced() {
  try {
    return Boolean(app.extensionManager?.setting?.get(ALWAYS_SHOW));
  } catch {
    return false;
  }
}

/** Advanced widgets are `hidden` while folded: the classic canvas then neither draws them nor keeps room for
 *  them (its layout counts every widget that is not hidden). Values and the prompt keep every widget. */
function applyFold(node) {
  for (const widget of node.widgets ?? []) {
    if (widget.advanced) widget.hidden = !node.showAdvanced;
  }
}

app.registerExtension({
  name: "ltx2av.AdvancedInputs",

  async nodeCreated(node) {
    const type = node.comfyClass ?? node.constructor?.comfyClass ?? node.type ?? "";
    if (!type.startsWith(PACK_PREFIX) || !node.widgets) return;
    let marked = false;
    for (const widget of node.widgets) {
      if (widget.options?.advanced && !widget.advanced) {
        widget.advanced = true;
        marked = true;
      }
    }
    if (!marked) return;
    if (alwaysShowAdvanced()) node.showAdvanced = true;
    applyFold(node);
    const toggleAdvanced = node.toggleAdvanced;
    node.toggleAdvanced = function () {
      const result = toggleAdvanced?.apply(this, arguments);
      applyFold(this);
      this.setSize([this.size[0], this.computeSize()[1]]);
      this.setDirtyCanvas?.(true, true);
      return result;
    };
    // A new node gets the height of what it shows; a loaded workflow sets its saved size afterwards.
    node.setSize([node.size[0], node.computeSize()[1]]);
  },
});
