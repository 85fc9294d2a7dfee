// Grad-CAM maps drawn client-side: a coarse h×w grid in [0, 1] is upsampled (bicubic) to the
// canvas, then coloured with the turbo colormap. The canvas sits over the photo and its CSS
// opacity is the overlay opacity, so moving the slider never redraws anything.

// Polynomial fit of Google's turbo colormap (Mikhailov 2019), precomputed as a 256-entry table.
const TURBO = (() => {
  const red = [0.13572138, 4.6153926, -42.66032258, 132.13108234, -152.94239396, 59.28637943];
  const green = [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604];
  const blue = [0.1066733, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973];
  const poly = (c, x) => c[0] + x * (c[1] + x * (c[2] + x * (c[3] + x * (c[4] + x * c[5]))));
  const byte = (v) => Math.round(255 * Math.min(1, Math.max(0, v)));
  const table = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i += 1) {
    const x = i / 255;
    table.set([byte(poly(red, x)), byte(poly(green, x)), byte(poly(blue, x))], i * 3);
  }
  return table;
})();

export function colour(value) {
  const i = 3 * Math.round(255 * Math.min(1, Math.max(0, value)));
  return [TURBO[i], TURBO[i + 1], TURBO[i + 2]];
}

// A CSS gradient of the colormap, for the legend.
export function colourGradient(stops = 11) {
  const parts = [];
  for (let n = 0; n < stops; n += 1) {
    const [r, g, b] = colour(n / (stops - 1));
    parts.push(`rgb(${r} ${g} ${b}) ${Math.round((100 * n) / (stops - 1))}%`);
  }
  return `linear-gradient(to right, ${parts.join(", ")})`;
}

// Keys cubic convolution kernel (a = -0.5, i.e. Catmull-Rom).
function cubic(t) {
  const x = Math.abs(t);
  if (x <= 1) return 1.5 * x ** 3 - 2.5 * x ** 2 + 1;
  if (x < 2) return -0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2;
  return 0;
}

// Per output coordinate: the four source indices and weights (pixel centres aligned, edges clamped).
function taps(outSize, inSize) {
  const result = [];
  for (let o = 0; o < outSize; o += 1) {
    const s = ((o + 0.5) * inSize) / outSize - 0.5;
    const base = Math.floor(s);
    const indices = [];
    const weights = [];
    for (let k = -1; k <= 2; k += 1) {
      indices.push(Math.min(inSize - 1, Math.max(0, base + k)));
      weights.push(cubic(s - (base + k)));
    }
    result.push({ indices, weights });
  }
  return result;
}

// Bicubic upsampling of rows (array of arrays) to width×height, clamped to [0, 1].
export function upsample(rows, width, height) {
  const inH = rows.length;
  const inW = rows[0].length;
  const across = taps(width, inW);
  const down = taps(height, inH);
  const horizontal = rows.map((row) => across.map(({ indices, weights }) =>
    indices.reduce((sum, i, k) => sum + weights[k] * row[i], 0)));
  const out = new Float32Array(width * height);
  for (let y = 0; y < height; y += 1) {
    const { indices, weights } = down[y];
    for (let x = 0; x < width; x += 1) {
      let value = 0;
      for (let k = 0; k < 4; k += 1) value += weights[k] * horizontal[indices[k]][x];
      out[y * width + x] = Math.min(1, Math.max(0, value));
    }
  }
  return out;
}

export function isValidMap(rows) {
  return Array.isArray(rows) && rows.length > 0 && Array.isArray(rows[0]) && rows[0].length > 0;
}

// Draws the map on the canvas at a resolution following the photo's aspect ratio.
export function drawHeatmap(canvas, rows, aspect, longSide = 320) {
  const width = aspect >= 1 ? longSide : Math.max(1, Math.round(longSide * aspect));
  const height = aspect >= 1 ? Math.max(1, Math.round(longSide / aspect)) : longSide;
  canvas.width = width;
  canvas.height = height;
  const values = upsample(rows, width, height);
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  for (let p = 0; p < values.length; p += 1) {
    const i = 3 * Math.round(255 * values[p]);
    image.data[4 * p] = TURBO[i];
    image.data[4 * p + 1] = TURBO[i + 1];
    image.data[4 * p + 2] = TURBO[i + 2];
    image.data[4 * p + 3] = 255;
  }
  context.putImageData(image, 0, 0);
}
